"""Imported first by the forkserver of data.prepare's worker processes (data/encode_files.py), and by nothing else.

The workers only read rows and tokenize them; they never hand tensors to torch. Without this, `datasets`
imports torch (seconds) in every worker at its first streaming dataset, to look for DataLoader workers.
The main process keeps the environment its caller gave it (the CLI sets the same for itself).
"""

import os

os.environ.setdefault("USE_TORCH", "0")
