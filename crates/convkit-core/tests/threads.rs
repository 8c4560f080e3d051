//! `threads::configure` on a process of its own: rayon's global pool is made once.

use rayon::prelude::*;

#[test]
fn the_configuring_thread_is_one_of_rayons_threads() {
    let choice = convkit_core::threads::configure(Some(2)).unwrap();
    assert_eq!(choice.threads, Some(2));
    assert_eq!(rayon::current_num_threads(), 2);
    // The caller is thread 0 of the pool: its parallel operations run here and on one worker.
    assert_eq!(rayon::current_thread_index(), Some(0));
    let here: Vec<Option<usize>> = (0..64)
        .into_par_iter()
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            rayon::current_thread_index()
        })
        .collect();
    assert!(here.iter().all(|i| matches!(i, Some(0 | 1))), "{here:?}");
    assert!(
        here.contains(&Some(0)),
        "the caller took no share: {here:?}"
    );
    // Another thread's operation still runs, on the worker, while this thread waits.
    let elsewhere = std::thread::spawn(|| (1..=100u64).into_par_iter().sum::<u64>());
    assert_eq!(elsewhere.join().unwrap(), 5050);
}
