import os

from hypothesis import settings

# Ranks start by fork in this suite: ~0.1 s instead of ~5 s per spawned rank importing torch,
# over ~60 multi-process calls. The harness's default (spawn) keeps its own test below.
os.environ.setdefault("FSDPKIT_TEST_START_METHOD", "fork")

# Property tests run on a shared 2-core machine: no per-example deadline, fewer examples in CI.
settings.register_profile("default", deadline=None, max_examples=200)
settings.register_profile("ci", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "default")
