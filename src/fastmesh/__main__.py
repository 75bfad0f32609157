import sys

from fastmesh.cli import main

sys.exit(main())
