"""`python -m detrcore.cli ...` (what torchrun runs for multi-process training)."""
from .main import main

main()
