"""Wire codecs both sides of the proxy use: what the bytes of each protocol
mean, with no I/O and no policy. Front ends and backends import from here;
nothing here imports from them, nor from the core."""
