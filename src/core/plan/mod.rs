//! Planners: pure functions that turn metadata into ordered steps for the engine.
