"""The error log: nginx-shaped lines, levels, targets, reopen (every layer logs through it)."""
