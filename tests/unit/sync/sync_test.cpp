// Semaphore, Event and KeyedMutex: FIFO hand-off, mutual exclusion per key and concurrency across
// keys under thousands of randomly interleaved tasks, cancellation of queued waiters, and that
// nothing is left behind (entries, units, waiters).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "layerd/core/cancel.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/core/task.hpp"
#include "layerd/sync/sync.hpp"

using namespace layerd;
using namespace std::chrono_literals;
using core::CancelSource;
using core::Loop;
using core::Scope;
using core::Task;
using sync::Event;
using sync::KeyedMutex;
using sync::Semaphore;

namespace {

Task<void> cancel_after_yields(CancelSource* source, int yields) {
  for (int i = 0; i < yields; ++i) co_await core::yield();
  source->cancel();
}

// --- Semaphore -------------------------------------------------------------------------------

Task<void> sem_take_in_order(Semaphore* sem, int id, std::vector<int>* order) {
  bool got = co_await sem->acquire();
  EXPECT_TRUE(got);
  order->push_back(id);
  co_await core::yield();
  sem->release();
}

Task<void> sem_fifo(Semaphore* sem, std::vector<int>* order) {
  // Hold the only unit so everyone queues, in spawn order.
  EXPECT_TRUE(co_await sem->acquire());
  Scope scope;
  for (int i = 0; i < 20; ++i) scope.spawn(sem_take_in_order(sem, i, order));
  co_await core::yield();
  EXPECT_EQ(sem->waiting(), 20u);
  sem->release();
  EXPECT_TRUE(co_await scope.join());
}

TEST(Semaphore, WaitersAreServedInFifoOrder) {
  Loop loop;
  Semaphore sem(1);
  std::vector<int> order;
  loop.block_on(sem_fifo(&sem, &order));
  std::vector<int> expected(20);
  for (int i = 0; i < 20; ++i) expected[i] = i;
  EXPECT_EQ(order, expected);
  EXPECT_EQ(sem.available(), 1u);
  EXPECT_EQ(sem.waiting(), 0u);
}

Task<void> sem_acquire_mark(Semaphore* sem, bool* ran) {
  EXPECT_TRUE(co_await sem->acquire());
  *ran = true;
  sem->release();
}

Task<void> sem_no_barging(Semaphore* sem, bool* granted_waiter_ran) {
  EXPECT_TRUE(sem->try_acquire());
  Scope scope;
  scope.spawn(sem_acquire_mark(sem, granted_waiter_ran));
  co_await core::yield();
  EXPECT_EQ(sem->waiting(), 1u);
  // Release hands the unit straight to the waiter: a newcomer cannot take it, and the waiter is
  // posted, not resumed inside release().
  sem->release();
  EXPECT_FALSE(*granted_waiter_ran);
  EXPECT_FALSE(sem->try_acquire());
  EXPECT_EQ(sem->available(), 0u);
  EXPECT_TRUE(co_await scope.join());
  EXPECT_TRUE(*granted_waiter_ran);
  EXPECT_TRUE(sem->try_acquire());
  sem->release();
}

TEST(Semaphore, ReleaseHandsOffWithoutBargingOrInlineResume) {
  Loop loop;
  Semaphore sem(1);
  bool ran = false;
  loop.block_on(sem_no_barging(&sem, &ran));
  EXPECT_EQ(sem.available(), 1u);
}

struct SemStats {
  int holders = 0;
  int max_holders = 0;
  int done = 0;
};

Task<void> sem_worker(Semaphore* sem, SemStats* stats, unsigned seed) {
  std::mt19937 rng(seed);
  for (int round = 0; round < 5; ++round) {
    Semaphore::Guard guard = co_await sem->scoped();
    EXPECT_TRUE(guard);
    ++stats->holders;
    stats->max_holders = std::max(stats->max_holders, stats->holders);
    EXPECT_LE(stats->holders, 3);
    if (rng() % 4 == 0) {
      (void)co_await core::sleep(std::chrono::microseconds(rng() % 200));
    } else {
      for (unsigned i = rng() % 3; i > 0; --i) co_await core::yield();
    }
    --stats->holders;
  }
  ++stats->done;
}

Task<void> sem_stress(Semaphore* sem, SemStats* stats) {
  Scope scope;
  for (unsigned i = 0; i < 500; ++i) scope.spawn(sem_worker(sem, stats, 1000 + i));
  EXPECT_TRUE(co_await scope.join());
}

TEST(Semaphore, BoundsConcurrentHoldersUnderRandomInterleaving) {
  Loop loop;
  Semaphore sem(3);
  SemStats stats;
  loop.block_on(sem_stress(&sem, &stats));
  EXPECT_EQ(stats.done, 500);
  EXPECT_EQ(stats.max_holders, 3);
  EXPECT_EQ(sem.available(), 3u);
  EXPECT_EQ(sem.waiting(), 0u);
}

Task<void> sem_waiter(Semaphore* sem, int id, CancelSource* cancel, std::vector<int>* order,
                      std::vector<int>* refused) {
  Semaphore::Guard guard = co_await sem->scoped(cancel);
  if (!guard) {
    refused->push_back(id);
    co_return;
  }
  order->push_back(id);
  co_await core::yield();
}

Task<void> sem_cancel_queued(Semaphore* sem, std::vector<int>* order, std::vector<int>* refused) {
  EXPECT_TRUE(sem->try_acquire());
  CancelSource cancel_odd;
  Scope scope;
  for (int i = 0; i < 10; ++i)
    scope.spawn(sem_waiter(sem, i, i % 2 ? &cancel_odd : nullptr, order, refused));
  co_await core::yield();
  EXPECT_EQ(sem->waiting(), 10u);
  cancel_odd.cancel();
  // Cancelled waiters leave the queue at once; they resolve through the ready queue.
  EXPECT_EQ(sem->waiting(), 5u);
  co_await core::yield();
  // A source cancels its waiters in no particular order; which ones matters.
  std::sort(refused->begin(), refused->end());
  EXPECT_EQ(*refused, (std::vector<int>{1, 3, 5, 7, 9}));
  sem->release();
  EXPECT_TRUE(co_await scope.join());
}

TEST(Semaphore, CancelledWaitersLeaveTheQueueAndTheRestStayInOrder) {
  Loop loop;
  Semaphore sem(1);
  std::vector<int> order, refused;
  loop.block_on(sem_cancel_queued(&sem, &order, &refused));
  EXPECT_EQ(order, (std::vector<int>{0, 2, 4, 6, 8}));
  EXPECT_EQ(sem.available(), 1u);
  EXPECT_EQ(sem.waiting(), 0u);
}

Task<bool> sem_acquire(Semaphore* sem, CancelSource* cancel) { co_return co_await sem->acquire(cancel); }

TEST(Semaphore, AnAlreadyCancelledSourceRefusesWhenNoUnitIsFree) {
  Loop loop;
  Semaphore sem(0);
  CancelSource cancel;
  cancel.cancel();
  EXPECT_FALSE(loop.block_on(sem_acquire(&sem, &cancel)));
  EXPECT_EQ(sem.waiting(), 0u);
  // A free unit is still taken (acquiring does not wait, so there is nothing to cancel).
  sem.release();
  EXPECT_TRUE(loop.block_on(sem_acquire(&sem, &cancel)));
  EXPECT_EQ(sem.available(), 0u);
}

Task<void> sem_deadline_waiter(Semaphore* sem, bool* got) {
  CancelSource cancel;
  core::Deadline deadline(cancel, 20ms);
  *got = co_await sem->acquire(&cancel);
  EXPECT_TRUE(deadline.expired());
}

TEST(Semaphore, ADeadlineCancelsAQueuedWaiter) {
  Loop loop;
  Semaphore sem(0);
  bool got = true;
  loop.block_on(sem_deadline_waiter(&sem, &got));
  EXPECT_FALSE(got);
  EXPECT_EQ(sem.waiting(), 0u);
}

// --- Event -----------------------------------------------------------------------------------

Task<void> event_waiter(Event* ev, int id, CancelSource* cancel, std::vector<int>* woken,
                        std::vector<int>* refused) {
  // Awaited into a variable: GCC 12 miscompiles `if (co_await ...)` (see src/sync/sync.cpp).
  bool set = co_await ev->wait(cancel);
  if (set) {
    woken->push_back(id);
  } else {
    refused->push_back(id);
  }
}

Task<void> event_flow(Event* ev, std::vector<int>* woken, std::vector<int>* refused) {
  CancelSource cancel_two;
  Scope scope;
  for (int i = 0; i < 6; ++i) scope.spawn(event_waiter(ev, i, i == 2 ? &cancel_two : nullptr, woken, refused));
  co_await core::yield();
  EXPECT_TRUE(woken->empty());
  cancel_two.cancel();
  co_await core::yield();
  EXPECT_EQ(*refused, std::vector<int>{2});
  ev->set();
  // set() posts the waiters; none has run yet.
  EXPECT_TRUE(woken->empty());
  EXPECT_TRUE(co_await scope.join());
  // Once set, a wait returns at once, even with a cancelled source.
  CancelSource cancelled;
  cancelled.cancel();
  EXPECT_TRUE(co_await ev->wait(&cancelled));
  ev->reset();
  EXPECT_FALSE(co_await ev->wait(&cancelled));
}

TEST(Event, SetWakesEveryWaiterInOrderAndCancelledOnesResolveFalse) {
  Loop loop;
  Event ev;
  std::vector<int> woken, refused;
  loop.block_on(event_flow(&ev, &woken, &refused));
  EXPECT_EQ(woken, (std::vector<int>{0, 1, 3, 4, 5}));
  EXPECT_FALSE(ev.is_set());
}

// --- KeyedMutex ------------------------------------------------------------------------------

Task<void> key_take_in_order(KeyedMutex* m, std::string key, int id, std::vector<int>* order) {
  KeyedMutex::Guard guard = co_await m->lock(key);
  EXPECT_TRUE(guard);
  EXPECT_EQ(guard.key(), key);
  order->push_back(id);
  co_await core::yield();
}

Task<void> key_fifo(KeyedMutex* m, std::vector<int>* order) {
  KeyedMutex::Guard first = co_await m->lock("layer");
  Scope scope;
  for (int i = 0; i < 20; ++i) scope.spawn(key_take_in_order(m, "layer", i, order));
  co_await core::yield();
  EXPECT_TRUE(m->is_locked("layer"));
  EXPECT_FALSE(m->try_lock("layer"));
  first.unlock();
  // Hand-off: the key stays held (by waiter 0, not yet resumed).
  EXPECT_TRUE(m->is_locked("layer"));
  EXPECT_TRUE(order->empty());
  EXPECT_TRUE(co_await scope.join());
}

TEST(KeyedMutex, WaitersOnAKeyAreServedInFifoOrder) {
  Loop loop;
  KeyedMutex m;
  std::vector<int> order;
  loop.block_on(key_fifo(&m, &order));
  std::vector<int> expected(20);
  for (int i = 0; i < 20; ++i) expected[i] = i;
  EXPECT_EQ(order, expected);
  EXPECT_EQ(m.entries(), 0u);
  EXPECT_FALSE(m.is_locked("layer"));
}

TEST(KeyedMutex, TryLockAndEntriesFollowTheHolders) {
  Loop loop;
  KeyedMutex m;
  {
    KeyedMutex::Guard a = m.try_lock("a");
    ASSERT_TRUE(a);
    EXPECT_FALSE(m.try_lock("a"));
    KeyedMutex::Guard b = m.try_lock("b");
    ASSERT_TRUE(b);
    EXPECT_EQ(m.entries(), 2u);
    // Moving a guard moves ownership; the moved-from guard unlocks nothing.
    KeyedMutex::Guard moved = std::move(a);
    EXPECT_FALSE(a);
    EXPECT_TRUE(moved);
    EXPECT_EQ(moved.key(), "a");
    a.unlock();
    EXPECT_TRUE(m.is_locked("a"));
    // Assigning over a held guard releases what it held.
    moved = std::move(b);
    EXPECT_FALSE(m.is_locked("a"));
    EXPECT_TRUE(m.is_locked("b"));
    EXPECT_EQ(m.entries(), 1u);
  }
  EXPECT_EQ(m.entries(), 0u);
}

struct KeyStats {
  std::map<std::string, int> holders;  // per key, at this instant
  int keys_held_now = 0;
  int max_keys_held = 0;
  int violations = 0;
  int done = 0;
  int cancelled = 0;
};

Task<void> key_worker(KeyedMutex* m, KeyStats* stats, unsigned seed, int nkeys,
                      CancelSource* cancel) {
  std::mt19937 rng(seed);
  for (int round = 0; round < 3; ++round) {
    // Random pause before each step so arrivals interleave differently every round.
    if (rng() % 3 == 0) {
      (void)co_await core::sleep(std::chrono::microseconds(rng() % 300));
    } else {
      for (unsigned i = rng() % 4; i > 0; --i) co_await core::yield();
    }
    std::string key = "layer-" + std::to_string(rng() % nkeys);
    bool cancellable = cancel != nullptr && rng() % 8 == 0;
    KeyedMutex::Guard guard = co_await m->lock(key, cancellable ? cancel : nullptr);
    if (!guard) {
      EXPECT_TRUE(cancellable);
      ++stats->cancelled;
      continue;
    }
    int& holders = stats->holders[key];
    if (++holders != 1) ++stats->violations;
    if (holders == 1) {
      ++stats->keys_held_now;
      stats->max_keys_held = std::max(stats->max_keys_held, stats->keys_held_now);
    }
    if (rng() % 4 == 0) {
      (void)co_await core::sleep(std::chrono::microseconds(rng() % 200));
    } else {
      for (unsigned i = rng() % 3; i > 0; --i) co_await core::yield();
    }
    if (--stats->holders[key] == 0) --stats->keys_held_now;
    // Half the time unlock explicitly, otherwise through the destructor.
    if (rng() % 2) guard.unlock();
  }
  ++stats->done;
}

Task<void> key_stress(KeyedMutex* m, KeyStats* stats, int tasks, int nkeys, unsigned seed,
                      bool with_cancel) {
  CancelSource cancel;
  Scope scope;
  for (int i = 0; i < tasks; ++i)
    scope.spawn(key_worker(m, stats, seed * 7919 + static_cast<unsigned>(i), nkeys,
                           with_cancel ? &cancel : nullptr));
  if (with_cancel) {
    // Cancel part-way through: queued cancellable waiters drop out, the rest carry on.
    for (int i = 0; i < 50; ++i) co_await core::yield();
    cancel.cancel();
  }
  EXPECT_TRUE(co_await scope.join());
}

TEST(KeyedMutex, MutualExclusionPerKeyAndConcurrencyAcrossKeys) {
  for (unsigned seed : {1u, 2u, 3u}) {
    Loop loop;
    KeyedMutex m;
    KeyStats stats;
    loop.block_on(key_stress(&m, &stats, 3000, 8, seed, false));
    EXPECT_EQ(stats.done, 3000) << "seed " << seed;
    EXPECT_EQ(stats.violations, 0) << "seed " << seed;
    // Different keys really were held at the same time.
    EXPECT_GT(stats.max_keys_held, 1) << "seed " << seed;
    EXPECT_LE(stats.max_keys_held, 8);
    EXPECT_EQ(stats.keys_held_now, 0);
    EXPECT_EQ(m.entries(), 0u) << "seed " << seed;
  }
}

TEST(KeyedMutex, RandomCancellationOfQueuedWaitersLeavesNothingBehind) {
  for (unsigned seed : {11u, 12u}) {
    Loop loop;
    KeyedMutex m;
    KeyStats stats;
    loop.block_on(key_stress(&m, &stats, 2000, 4, seed, true));
    EXPECT_EQ(stats.done, 2000) << "seed " << seed;
    EXPECT_EQ(stats.violations, 0) << "seed " << seed;
    EXPECT_GT(stats.cancelled, 0) << "seed " << seed;
    EXPECT_EQ(m.entries(), 0u) << "seed " << seed;
  }
}

Task<void> key_waiter(KeyedMutex* m, int id, CancelSource* cancel, std::vector<int>* order,
                      std::vector<int>* refused) {
  KeyedMutex::Guard guard = co_await m->lock("k", cancel);
  if (!guard) {
    EXPECT_TRUE(guard.key().empty());
    refused->push_back(id);
    co_return;
  }
  order->push_back(id);
  co_await core::yield();
}

Task<void> key_cancel_queued(KeyedMutex* m, std::vector<int>* order, std::vector<int>* refused) {
  KeyedMutex::Guard holder = co_await m->lock("k");
  std::vector<CancelSource> sources(8);
  Scope scope;
  for (int i = 0; i < 8; ++i) scope.spawn(key_waiter(m, i, &sources[i], order, refused));
  co_await core::yield();
  // Cancel the head, one in the middle and the tail of the queue.
  sources[0].cancel();
  sources[4].cancel();
  sources[7].cancel();
  co_await core::yield();
  std::sort(refused->begin(), refused->end());
  EXPECT_EQ(*refused, (std::vector<int>{0, 4, 7}));
  EXPECT_EQ(m->entries(), 1u);
  holder.unlock();
  EXPECT_TRUE(co_await scope.join());
}

TEST(KeyedMutex, CancelledWaitersResolveEmptyAndTheQueueContinuesInOrder) {
  Loop loop;
  KeyedMutex m;
  std::vector<int> order, refused;
  loop.block_on(key_cancel_queued(&m, &order, &refused));
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 5, 6}));
  EXPECT_EQ(m.entries(), 0u);
}

Task<void> key_cancel_all_waiters(KeyedMutex* m, std::vector<int>* order,
                                  std::vector<int>* refused) {
  KeyedMutex::Guard holder = co_await m->lock("k");
  CancelSource cancel;
  Scope scope;
  for (int i = 0; i < 4; ++i) scope.spawn(key_waiter(m, i, &cancel, order, refused));
  scope.spawn(cancel_after_yields(&cancel, 2));
  EXPECT_TRUE(co_await scope.join());
  // Every waiter gave up while the key was still held; unlocking now frees the entry.
  EXPECT_EQ(m->entries(), 1u);
  holder.unlock();
  EXPECT_EQ(m->entries(), 0u);
}

TEST(KeyedMutex, TheEntryGoesWhenTheHolderLeavesAfterAllWaitersGaveUp) {
  Loop loop;
  KeyedMutex m;
  std::vector<int> order, refused;
  loop.block_on(key_cancel_all_waiters(&m, &order, &refused));
  EXPECT_TRUE(order.empty());
  EXPECT_EQ(refused.size(), 4u);
  EXPECT_EQ(m.entries(), 0u);
}

Task<void> key_lock_mark(KeyedMutex* m, CancelSource* cancel, bool* got) {
  KeyedMutex::Guard guard = co_await m->lock("k", cancel);
  *got = static_cast<bool>(guard);
}

Task<void> key_granted_then_cancelled(KeyedMutex* m, bool* got) {
  KeyedMutex::Guard holder = co_await m->lock("k");
  CancelSource cancel;
  Scope scope;
  scope.spawn(key_lock_mark(m, &cancel, got));
  co_await core::yield();
  // The unlock hands the key over; a cancel arriving before the new owner runs is too late:
  // the waiter owns the key and must resolve to a held guard (or the key would leak).
  holder.unlock();
  cancel.cancel();
  EXPECT_TRUE(co_await scope.join());
}

TEST(KeyedMutex, ACancelAfterTheHandOffIsTooLate) {
  Loop loop;
  KeyedMutex m;
  bool got = false;
  loop.block_on(key_granted_then_cancelled(&m, &got));
  EXPECT_TRUE(got);
  EXPECT_EQ(m.entries(), 0u);
}

Task<bool> key_lock_cancelled(KeyedMutex* m, CancelSource* cancel) {
  KeyedMutex::Guard guard = co_await m->lock("busy", cancel);
  co_return static_cast<bool>(guard);
}

TEST(KeyedMutex, AnAlreadyCancelledSourceDoesNotQueue) {
  Loop loop;
  KeyedMutex m;
  CancelSource cancel;
  cancel.cancel();
  {
    KeyedMutex::Guard held = m.try_lock("busy");
    EXPECT_FALSE(loop.block_on(key_lock_cancelled(&m, &cancel)));
    EXPECT_EQ(m.entries(), 1u);
  }
  EXPECT_EQ(m.entries(), 0u);
  // A free key is taken without waiting, cancelled source or not.
  EXPECT_TRUE(loop.block_on(key_lock_cancelled(&m, &cancel)));
  EXPECT_EQ(m.entries(), 0u);
}

}  // namespace
