// layerd-microbench: the cost of the core loop's building blocks, with Google Benchmark.
//
//   ring/nop               one co_await core::nop(): SQE, submit, CQE, ready queue, resume
//   ring/nop_batch/N       N coroutines each looping on nop(): throughput with N in flight
//   task/await_ready       co_await of a Task that finishes synchronously (symmetric transfer)
//   loop/yield             co_await core::yield(): one trip through the ready queue
//   keyed_mutex/uncontended    lock + unlock of a free key (entry created and erased each time)
//   keyed_mutex/contended/N    N coroutines on one key; each holds it across a yield, so every
//                              unlock is a FIFO hand-off to the next waiter
//   semaphore/uncontended      acquire + release with a free unit
//   semaphore/contended/N      N coroutines on a 1-unit semaphore, hand-off on every release
//
// Each benchmark runs its body as a coroutine on a fresh Loop through block_on.
#include <benchmark/benchmark.h>

#include <string>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/core/task.hpp"
#include "layerd/sync/sync.hpp"

namespace core = layerd::core;
using layerd::sync::KeyedMutex;
using layerd::sync::Semaphore;

namespace {

// Hand-offs per batch in the contended benchmarks: large enough to hide the cost of spawning
// the workers.
constexpr int kBatch = 4096;

core::Task<void> nop_loop(benchmark::State* state) {
  for (auto _ : *state) {
    int res = co_await core::nop();
    benchmark::DoNotOptimize(res);
  }
}

void BM_RingNop(benchmark::State& state) {
  core::Loop loop;
  loop.block_on(nop_loop(&state));
}
BENCHMARK(BM_RingNop)->Name("ring/nop");

core::Task<void> nop_worker(int rounds) {
  for (int i = 0; i < rounds; ++i) {
    int res = co_await core::nop();
    benchmark::DoNotOptimize(res);
  }
}

core::Task<void> nop_batches(benchmark::State* state, int in_flight) {
  core::Scope scope;
  while (state->KeepRunningBatch(kBatch)) {
    for (int i = 0; i < in_flight; ++i) scope.spawn(nop_worker(kBatch / in_flight));
    (void)co_await scope.join();
  }
}

void BM_RingNopBatch(benchmark::State& state) {
  core::Loop loop;
  loop.block_on(nop_batches(&state, static_cast<int>(state.range(0))));
}
BENCHMARK(BM_RingNopBatch)->Name("ring/nop_batch")->Arg(16)->Arg(128);

core::Task<int> ready_value(int i) { co_return i + 1; }

core::Task<void> await_ready_loop(benchmark::State* state) {
  int i = 0;
  for (auto _ : *state) {
    i = co_await ready_value(i);
    benchmark::DoNotOptimize(i);
  }
}

void BM_AwaitReadyTask(benchmark::State& state) {
  core::Loop loop;
  loop.block_on(await_ready_loop(&state));
}
BENCHMARK(BM_AwaitReadyTask)->Name("task/await_ready");

core::Task<void> yield_loop(benchmark::State* state) {
  for (auto _ : *state) co_await core::yield();
}

void BM_Yield(benchmark::State& state) {
  core::Loop loop;
  loop.block_on(yield_loop(&state));
}
BENCHMARK(BM_Yield)->Name("loop/yield");

core::Task<void> keyed_uncontended(benchmark::State* state, KeyedMutex* mutex) {
  const std::string key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
  for (auto _ : *state) {
    KeyedMutex::Guard guard = co_await mutex->lock(key);
    benchmark::DoNotOptimize(&guard);
    guard.unlock();
  }
}

void BM_KeyedMutexUncontended(benchmark::State& state) {
  core::Loop loop;
  KeyedMutex mutex;
  loop.block_on(keyed_uncontended(&state, &mutex));
}
BENCHMARK(BM_KeyedMutexUncontended)->Name("keyed_mutex/uncontended");

core::Task<void> keyed_worker(KeyedMutex* mutex, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    KeyedMutex::Guard guard = co_await mutex->lock("layer");
    // Hold the key across a suspension so the other workers queue behind it.
    co_await core::yield();
    guard.unlock();
  }
}

core::Task<void> keyed_contended(benchmark::State* state, KeyedMutex* mutex, int workers) {
  core::Scope scope;
  while (state->KeepRunningBatch(kBatch)) {
    for (int i = 0; i < workers; ++i) scope.spawn(keyed_worker(mutex, kBatch / workers));
    (void)co_await scope.join();
  }
}

void BM_KeyedMutexContended(benchmark::State& state) {
  core::Loop loop;
  KeyedMutex mutex;
  loop.block_on(keyed_contended(&state, &mutex, static_cast<int>(state.range(0))));
  if (mutex.entries() != 0) state.SkipWithError("entries left behind");
}
BENCHMARK(BM_KeyedMutexContended)->Name("keyed_mutex/contended")->Arg(2)->Arg(16)->Arg(256);

core::Task<void> semaphore_uncontended(benchmark::State* state, Semaphore* sem) {
  for (auto _ : *state) {
    bool got = co_await sem->acquire();
    benchmark::DoNotOptimize(got);
    sem->release();
  }
}

void BM_SemaphoreUncontended(benchmark::State& state) {
  core::Loop loop;
  Semaphore sem(4);
  loop.block_on(semaphore_uncontended(&state, &sem));
}
BENCHMARK(BM_SemaphoreUncontended)->Name("semaphore/uncontended");

core::Task<void> semaphore_worker(Semaphore* sem, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    bool got = co_await sem->acquire();
    benchmark::DoNotOptimize(got);
    co_await core::yield();
    sem->release();
  }
}

core::Task<void> semaphore_contended(benchmark::State* state, Semaphore* sem, int workers) {
  core::Scope scope;
  while (state->KeepRunningBatch(kBatch)) {
    for (int i = 0; i < workers; ++i) scope.spawn(semaphore_worker(sem, kBatch / workers));
    (void)co_await scope.join();
  }
}

void BM_SemaphoreContended(benchmark::State& state) {
  core::Loop loop;
  Semaphore sem(1);
  loop.block_on(semaphore_contended(&state, &sem, static_cast<int>(state.range(0))));
}
BENCHMARK(BM_SemaphoreContended)->Name("semaphore/contended")->Arg(16);

}  // namespace

BENCHMARK_MAIN();
