"""Generation engines behind one small interface (see base.py); one file per engine."""
