"""Event sources: they translate the outside world into events on the daemon's queue."""
