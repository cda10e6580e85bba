import os

from hypothesis import settings

# Ranks start from a fork server in this suite: ~0.1 s instead of ~5 s per spawned rank
# importing torch, over ~60 multi-process calls. Not plain fork: a pytest-xdist worker has run
# other tests in-process (TCPStore servers, gloo groups, background saves), and a rank forked
# from it hung on whatever lock one of those threads held at that moment (CI, HSDP test).
os.environ.setdefault("FSDPKIT_TEST_START_METHOD", "forkserver")

# Property tests run on a shared 2-core machine: no per-example deadline, fewer examples in CI.
settings.register_profile("default", deadline=None, max_examples=200)
settings.register_profile("ci", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "default")
