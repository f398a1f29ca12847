pub mod doctor;
pub mod infer;
pub mod stub;
