"""The observer: watches repositories and publishes every new commit."""
