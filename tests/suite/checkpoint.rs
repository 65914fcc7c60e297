//! Checkpoints that are broken in the ways real ones get broken: each is an error that
//! names the file and the tensor, never a silent choice or a hang.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use tfc_runtime::Checkpoint;

use crate::common::*;

fn scratch(name: &str) -> PathBuf {
    let d = root().join("target/test-checkpoints").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes f32 tensors of the given lengths (values 0, 1, 2, …) as one safetensors file.
fn write(path: &Path, tensors: &[(&str, usize)]) {
    let data: Vec<Vec<u8>> =
        tensors.iter().map(|(_, n)| (0..*n).flat_map(|i| (i as f32).to_le_bytes()).collect()).collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, n), d)| (*name, TensorView::new(safetensors::Dtype::F32, vec![*n], d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn index(dir: &Path, map: &[(&str, &str)]) {
    let weight_map: HashMap<&str, &str> = map.iter().copied().collect();
    let json = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), json.to_string()).unwrap();
}

fn error(path: &Path) -> String {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn shards_follow_the_index_and_never_repeat_a_tensor() {
    let d = scratch("shards");
    write(&d.join("a.safetensors"), &[("x", 2), ("y", 3)]);
    write(&d.join("b.safetensors"), &[("z", 4)]);
    index(&d, &[("x", "a.safetensors"), ("y", "a.safetensors"), ("z", "b.safetensors")]);
    let ck = Checkpoint::open(&d).unwrap();
    assert_eq!(ck.names(), ["x", "y", "z"]);
    assert_eq!(ck.get("z", &[4]).unwrap(), [0.0, 1.0, 2.0, 3.0]);

    // The same tensor in two shards: refused, naming both.
    write(&d.join("b.safetensors"), &[("z", 4), ("y", 3)]);
    let e = error(&d);
    assert!(
        e.contains("tensor `y` is in both") && e.contains("a.safetensors") && e.contains("b.safetensors"),
        "{e}"
    );

    // The index places a tensor in a shard that does not hold it.
    write(&d.join("b.safetensors"), &[("z", 4)]);
    index(&d, &[("x", "a.safetensors"), ("y", "b.safetensors"), ("z", "b.safetensors")]);
    let e = error(&d);
    assert!(e.contains("places `y` in") && e.contains("which does not hold it"), "{e}");

    // A shard name that leaves the folder.
    index(&d, &[("x", "../a.safetensors")]);
    assert!(error(&d).contains("is not a file name beside the index"));

    // An index that is not JSON is called an index, not a safetensors file.
    std::fs::write(d.join("model.safetensors.index.json"), "{ not json").unwrap();
    let e = error(&d);
    assert!(e.contains("model.safetensors.index.json is not a valid safetensors index"), "{e}");
}

#[test]
fn paths_that_are_not_files_are_named_for_what_they_are() {
    let d = scratch("not-files");
    std::fs::create_dir(d.join("model.safetensors")).unwrap();
    let e = error(&d);
    assert!(e.contains("model.safetensors is a folder"), "{e}");

    let d = scratch("broken-link");
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("model.safetensors")).unwrap();
    assert!(error(&d).contains("model.safetensors is a broken symbolic link"));

    // A FIFO would block the reader forever.
    let d = scratch("fifo");
    let fifo = d.join("model.safetensors");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    assert!(error(&d).contains("is a FIFO, socket or device"));
    assert!(error(&fifo).contains("is a FIFO, socket or device"));

    assert!(error(&scratch("empty")).contains("holds no `model.safetensors`"));
}

#[test]
fn a_damaged_header_names_the_tensor() {
    let d = scratch("header");
    let file = d.join("model.safetensors");
    write(&file, &[("first", 4), ("second", 3)]);
    let mut bytes = std::fs::read(&file).unwrap();
    // Say `second` has 4 values where its offsets hold 3 (a patch of the same length).
    let at = bytes.windows(11).position(|w| w == b"\"shape\":[3]").expect("the header has shape [3]");
    bytes[at + 9] = b'4';
    std::fs::write(&file, &bytes).unwrap();
    let e = error(&file);
    assert!(
        e.contains("tensor `second` (F32 [4]) needs 16 bytes, but its data offsets 16..28 hold 12"),
        "{e}"
    );

    // Truncated: the last tensor's data ends past the end of the file.
    write(&file, &[("first", 4), ("second", 3)]);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
    let e = error(&file);
    assert!(e.contains("tensor `second` ends at byte 28") && e.contains("truncated"), "{e}");
}

#[test]
fn a_row_range_reads_those_rows_in_place_and_a_bad_one_is_an_error() {
    let dir = scratch("rows");
    let file = dir.join("model.safetensors");
    write(&file, &[("fused.weight", 12)]);
    let ck = Checkpoint::open(&file).unwrap();
    assert_eq!(ck.get("fused.weight[3:7]", &[4]).unwrap(), vec![3.0, 4.0, 5.0, 6.0]);
    assert!(ck.contains("fused.weight[0:1]"));
    for (name, what) in [
        ("fused.weight[8:13]", "asks for rows 8..13 of a tensor of shape [12]"),
        ("fused.weight[5:5]", "asks for rows 5..5"),
        ("other.weight[0:2]", "has no tensor `other.weight`"),
    ] {
        let e = ck.get(name, &[5]).unwrap_err().to_string();
        assert!(e.contains(what), "{name}: {e}");
    }
    // Rows of a matrix: whole rows of it.
    let fx = Checkpoint::open(root().join("tests/fixtures/hf/phi3")).unwrap();
    let name = "model.layers.0.mlp.gate_up_proj.weight";
    let whole = fx.get(name, &[320, 64]).unwrap();
    assert_eq!(fx.get(&format!("{name}[160:320]"), &[160, 64]).unwrap(), whole[160 * 64..]);
}
