//! Everything that touches QEMU: argv and spawning ([`launch`]), the QMP client ([`qmp`]), the
//! serial console ([`console`]), per-run disk overlays ([`image`]) and the running machine with
//! its shutdown ladder ([`machine`]).

pub mod console;
pub mod image;
pub mod launch;
pub mod machine;
pub mod qmp;
