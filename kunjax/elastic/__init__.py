"""Parameter-centric elasticity (KunServe, DESIGN.md §6): monitor, planner, drop/restore as resharding, pipeline
groups with remote attention and live KV exchange. `KunServeController` is the policy the engine runs with
`--policy kunserve`."""
