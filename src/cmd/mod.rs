pub mod coordinator;
pub mod doctor;
pub mod infer;
pub mod run;
pub mod stub;
pub mod student;
