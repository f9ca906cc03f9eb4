"""TileLang kernel builders and launchers, one stage per file. Nothing here runs at import time."""
