"""Watch streams: WatchTaskNode and WatchTask (see hub, tokens and service)."""
