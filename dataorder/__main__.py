import sys

from dataorder.cli import main

sys.exit(main())
