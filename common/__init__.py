"""What the observer, dispatcher and runner share: messages, names, broker, settings."""
