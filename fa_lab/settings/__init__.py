"""Layer 0, settings: every setting (`config`), the machine a number was measured on
(`machine`, `cpu_features`, `blas`), and the tuning file (`tuning_file`). Imports no other
fa_lab layer."""
