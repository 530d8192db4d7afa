import sys

from dbr_builder.cli import main

sys.exit(main())
