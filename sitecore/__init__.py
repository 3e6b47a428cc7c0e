"""The hospital's side of fedmeta without Flower: what a site loads, trains, scores and adapts.

- :mod:`fedmeta.sitecore.data`: the site's own data, validated before anything runs;
- :mod:`fedmeta.sitecore.train`: one round's update, by the experiment's algorithm;
- :mod:`fedmeta.sitecore.evaluate`: scores before and after local adaptation.

The Flower ClientApp (:mod:`fedmeta.client`) only unpacks a message, calls these, and packs the
reply; ``fedmeta adapt`` and the benchmarks call them directly.
"""
