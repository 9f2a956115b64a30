"""What every layer may use of the machine: files written atomically and checked by their sha256, locks, free
ports (files, net). No posweep concept lives here."""
