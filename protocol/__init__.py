"""What crosses the wire between the coordinator and a hospital, and nothing else.

Both sides' Flower glue (:mod:`fedmeta.server`, :mod:`fedmeta.client`) build and read messages
with the helpers and names here, so the message layout is written down once:

- :mod:`fedmeta.protocol.records`: numpy dicts <-> Flower ``ArrayRecord``, payload sizes;
- :mod:`fedmeta.protocol.keys`: record and config keys of every message kind.
"""
