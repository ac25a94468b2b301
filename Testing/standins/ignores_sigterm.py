"""A child that ignores SIGTERM and keeps running, as the engine does inside a long native call
(an ITK filter, a big convolution): only SIGKILL stops it. Prints its PID as a JSON event."""

import json
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"event": "start", "pid": __import__("os").getpid()}), flush=True)
time.sleep(120)
