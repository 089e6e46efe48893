"""Private descriptor pool for the generated modules (written by proto/generate.py; do not edit).

Keeps the ``inference.*`` types out of protobuf's default pool, where
tritonclient registers the same file and message names.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
