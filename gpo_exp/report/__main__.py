"""`python -m gpo_exp.report`."""
import sys

from gpo_exp.report import main

sys.exit(main())
