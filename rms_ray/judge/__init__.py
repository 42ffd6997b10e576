"""The safety judge: prompt + verdict parsing + unsafe score, importers, metrics, evaluate."""
