//! Text data sets: the reader lives in the libtorch-free `distill-data`
//! crate, shared with the coordinator so both count the same examples.

pub use distill_data::{
    fields, read_examples, read_with, training_examples, Example, Fields, Read, Skipped,
};

impl From<distill_data::Error> for crate::Error {
    fn from(e: distill_data::Error) -> Self {
        match e {
            distill_data::Error::Io { path, source } => crate::Error::Io { path, source },
            distill_data::Error::Data { path, message } => crate::Error::Data { path, message },
            e @ distill_data::Error::Field { .. } => crate::Error::Invalid(e.to_string()),
        }
    }
}
