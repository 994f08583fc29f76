"""The long-running service: attachments, control socket, config, systemd."""
