import sys

from medai.cli import main

sys.exit(main())
