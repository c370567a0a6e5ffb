"""unionfs: a rootless overlay filesystem in pyfuse3 + trio."""
