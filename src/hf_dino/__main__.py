import sys

from hf_dino.cli import main

sys.exit(main())
