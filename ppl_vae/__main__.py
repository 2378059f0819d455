"""``python -m ppl_vae ...`` (and ``torchrun ... -m ppl_vae ...``): the command line."""
import sys

from .cli import main

sys.exit(main())
