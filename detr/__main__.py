import sys

from detr.cli import main

sys.exit(main())
