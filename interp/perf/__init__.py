"""Performance switches: each trick with its switch, measured effect and accuracy cost."""
