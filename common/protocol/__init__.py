"""Wire types, one module per channel, each saying who sends to whom.

* ``ready`` - service process -> launcher: ``Ready`` / ``Failed`` at start-up.
"""
