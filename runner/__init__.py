"""The runner: takes one job at a time from its own queue and runs the tests."""
