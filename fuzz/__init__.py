"""Coverage-guided fuzzing (atheris) of every parser that reads untrusted
bytes. `python -m fuzz.run --seconds 60` runs each target in turn; see
fuzz/run.py."""
