"""labkit for unprivileged users: the privileged daemon (:mod:`.daemon`, ``labkit serve``), its wire
format (:mod:`.protocol`) and its client (:mod:`.client`, what the CLI uses when it is not root)."""
