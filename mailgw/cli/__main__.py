"""``python -m mailgw.cli``: run the ``mailgw`` admin command."""

import sys

from mailgw.cli.main import main

sys.exit(main())
