"""Process exit codes, named so scripts and service managers can tell them apart."""

OK = 0
UNHEALTHY = 1  # `volt check` found something wrong
USAGE = 2  # a user mistake: bad flag, bad URL, missing repository
BROKER_UNAVAILABLE = 3  # gave up reaching RabbitMQ
INTERRUPTED = 130  # stopped by a second signal
BROKEN_PIPE = 141  # the reader of our output went away (128 + SIGPIPE, as the shell says)


class CommandFailed(Exception):
    """A command that could not do its job; the message is one line for the user."""

    code = UNHEALTHY
