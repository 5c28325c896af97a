"""Fault scenarios (`make test-faults`): the proxy as a child process against a failing upstream,
kill -9, SIGTERM and long outages, each ending in the invariant check of `invariants`."""
