"""Property tests draw the same examples on every run (derandomized): a test that passes once passes
again, and a failure is reproduced by rerunning. No deadline: CI machines are shared and slow."""
from hypothesis import settings

settings.register_profile("llmsim", derandomize=True, deadline=None)
settings.load_profile("llmsim")
