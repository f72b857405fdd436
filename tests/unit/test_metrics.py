"""The event families counted in plain numbers (proxy.metrics.Counts,
Timings) export what prometheus_client's own Counter and Histogram export
for the same events, sample for sample (their creation times aside)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import DECISION_BUCKETS, Counts, Timings

LABELS = st.sampled_from([("imap", "accepted"), ("ldap", "refused"), ("smtp", "accepted")])
# Values on the buckets' bounds too: a bound is "at or under" (le).
SECONDS = st.one_of(st.sampled_from(DECISION_BUCKETS), st.floats(0, 20, allow_nan=False))


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


@given(st.lists(st.tuples(LABELS, SECONDS), max_size=40))
def test_counts_and_timings_export_what_prometheus_client_would(events):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counts = Counts("sign_ins", "Sign-ins", ["protocol", "outcome"])
    timings = Timings("decision_seconds", "Time", ["protocol", "outcome"], DECISION_BUCKETS)
    ours.register(counts)
    ours.register(timings)
    counter = Counter("legacy_auth_proxy_sign_ins", "Sign-ins", ["protocol", "outcome"],
                      registry=theirs)
    histogram = Histogram("legacy_auth_proxy_decision_seconds", "Time", ["protocol", "outcome"],
                          buckets=DECISION_BUCKETS, registry=theirs)
    for labels, seconds in events:
        counts.inc(labels)
        timings.observe(labels, seconds)
        counter.labels(*labels).inc()
        histogram.labels(*labels).observe(seconds)
    assert samples(ours) == samples(theirs)


def test_each_set_of_labels_says_when_it_was_first_counted():
    registry = CollectorRegistry()
    counts = Counts("sign_ins", "Sign-ins", ["protocol"])
    timings = Timings("decision_seconds", "Time", ["protocol"], DECISION_BUCKETS)
    registry.register(counts)
    registry.register(timings)
    counts.inc(("imap",))
    timings.observe(("imap",), 0.001)
    text = generate_latest(registry).decode()
    assert 'legacy_auth_proxy_sign_ins_created{protocol="imap"}' in text
    assert 'legacy_auth_proxy_decision_seconds_created{protocol="imap"}' in text
