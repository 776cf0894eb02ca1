//! The restore into live tables: how each table is loaded, what is set aside
//! around the load and put back before the commit, and how a conflict between the
//! snapshot's rows and the live schema is reported (see [`plan`]).

pub(crate) mod conflict;
pub(crate) mod indexes;
pub(crate) mod keys;
pub(crate) mod merge;
pub(crate) mod plan;
pub(crate) mod shadow;
