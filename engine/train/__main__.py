"""`python -m clipforge.train` and `deepspeed --module clipforge.train`."""
import sys

from .run import main

sys.exit(main())
