"""The admin socket and its client, agent-ctl."""
