"""NBD protocol: sans-IO codec, server loop, kernel netlink client."""
