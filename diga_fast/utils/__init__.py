"""The bottom floor: collectives and seeded sharding (:mod:`dist`), atomic files and images (:mod:`io`)."""
