"""The certification: sample streams and the runtime contract, counting, the exact test with FWER control,
per-pixel radii and certified metrics. Imports the stage maths below it and nothing above."""
