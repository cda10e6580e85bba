import os

from hypothesis import settings

# Property tests run on a shared 2-core machine: no per-example deadline, fewer examples in CI.
settings.register_profile("default", deadline=None, max_examples=200)
settings.register_profile("ci", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "default")
